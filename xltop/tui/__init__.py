"""The Textual TUI: the app, its command table, its styles and its widgets. The only part of
xltop that imports Textual; everything else (the monitor core) works without it."""
