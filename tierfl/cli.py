"""The `tierfl` command line."""
def main() -> int:
    return 0
