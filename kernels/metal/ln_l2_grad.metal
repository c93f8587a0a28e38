// Body of an mx.fast.metal_kernel: one thread per row of Z (rows of length N; the row's head is
// (row / ROWS_PER_HEAD) % NH). G = d/dZ 0.5 * ||gamma * xhat + beta - T||^2  (docs/ttt-maths.md).
uint row = thread_position_in_grid.x;
if (row >= ROWS) {
    return;
}
uint h = (row / ROWS_PER_HEAD) % NH;
const device T* zr = z + row * N;
const device T* tr = target + row * N;
const device T* gr = gamma + h * N;
const device T* br = beta + h * N;

float mean = 0.0f;
for (uint i = 0; i < N; ++i) mean += float(zr[i]);
mean /= float(N);
float var = 0.0f;
for (uint i = 0; i < N; ++i) {
    float d = float(zr[i]) - mean;
    var += d * d;
}
float sigma = metal::sqrt(var / float(N) + 1e-6f);

// Two passes over the row: the sums first, then the gradient (xhat and g are recomputed, not stored).
float sum_g = 0.0f;
float sum_gx = 0.0f;
for (uint i = 0; i < N; ++i) {
    float xhat = (float(zr[i]) - mean) / sigma;
    float g = (float(gr[i]) * xhat + float(br[i]) - float(tr[i])) * float(gr[i]);
    sum_g += g;
    sum_gx += g * xhat;
}
for (uint i = 0; i < N; ++i) {
    float xhat = (float(zr[i]) - mean) / sigma;
    float g = (float(gr[i]) * xhat + float(br[i]) - float(tr[i])) * float(gr[i]);
    grad[row * N + i] = T((float(N) * g - sum_g - xhat * sum_gx) / (float(N) * sigma));
}
