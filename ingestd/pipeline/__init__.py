"""The pipeline: assemble -> route -> package -> deliver, each stage run by `runner`, assembled by `build`."""
