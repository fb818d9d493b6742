"""Small helpers shared by the package and its command-line tools."""
