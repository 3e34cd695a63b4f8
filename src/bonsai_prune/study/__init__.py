"""Studies: grids of prune + evaluate cells, cached; their runner, report and plots."""
