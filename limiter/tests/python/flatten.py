"""Reads one JSON document on stdin and prints one `path value` line per leaf, paths joined with
dots (list items by index), values as JSON scalars with strings unquoted. The Rust tests read
these lines, so they need no JSON parser of their own."""

import json
import sys


def walk(prefix, value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(value, list):
        yield (f"{prefix}.len", len(value))
        for i, v in enumerate(value):
            yield from walk(f"{prefix}.{i}", v)
    else:
        yield (prefix, value)


def main():
    for path, value in walk("", json.load(sys.stdin)):
        text = value if isinstance(value, str) else json.dumps(value)
        print(f"{path} {text}".replace("\n", "\\n"))


if __name__ == "__main__":
    main()
