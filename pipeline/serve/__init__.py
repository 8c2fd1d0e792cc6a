"""Stage 7: serve the table over HTTP (`icar serve`, or Ray Serve on a cluster) with a search page."""
