// Body of an mx.fast.cuda_kernel: one thread per row of Z (rows of length N; the row's head is
// (row / ROWS_PER_HEAD) % NH). G = d/dZ 0.5 * ||gamma * xhat + beta - T||^2  (docs/ttt-maths.md).
unsigned int row = blockIdx.x * blockDim.x + threadIdx.x;
if (row >= ROWS) {
    return;
}
unsigned int h = (row / ROWS_PER_HEAD) % NH;
const T* zr = z + row * N;
const T* tr = target + row * N;
const T* gr = gamma + h * N;
const T* br = beta + h * N;

float mean = 0.0f;
for (unsigned int i = 0; i < N; ++i) mean += static_cast<float>(zr[i]);
mean /= static_cast<float>(N);
float var = 0.0f;
for (unsigned int i = 0; i < N; ++i) {
    float d = static_cast<float>(zr[i]) - mean;
    var += d * d;
}
float sigma = sqrtf(var / static_cast<float>(N) + 1e-6f);

// Two passes over the row: the sums first, then the gradient (xhat and g are recomputed, not stored).
float sum_g = 0.0f;
float sum_gx = 0.0f;
for (unsigned int i = 0; i < N; ++i) {
    float xhat = (static_cast<float>(zr[i]) - mean) / sigma;
    float g = (static_cast<float>(gr[i]) * xhat + static_cast<float>(br[i]) - static_cast<float>(tr[i]))
              * static_cast<float>(gr[i]);
    sum_g += g;
    sum_gx += g * xhat;
}
for (unsigned int i = 0; i < N; ++i) {
    float xhat = (static_cast<float>(zr[i]) - mean) / sigma;
    float g = (static_cast<float>(gr[i]) * xhat + static_cast<float>(br[i]) - static_cast<float>(tr[i]))
              * static_cast<float>(gr[i]);
    grad[row * N + i] = static_cast<T>((static_cast<float>(N) * g - sum_g - xhat * sum_gx)
                                       / (static_cast<float>(N) * sigma));
}
