"""User interfaces: the `sdxl` command line (and later the server)."""
