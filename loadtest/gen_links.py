#!/usr/bin/env python3
"""Generates N short links and the files each server and load generator reads.

Codes are lowercase base36 (`[0-9a-z]`), all the same length (7 by default),
drawn from a seeded RNG, so the output is the same for the same arguments.
Lowercase keeps them safe for nginx's `map`, whose string keys are matched
ignoring case; the fixed length lets wrk's Lua script and k6 index the code
list without splitting it into millions of strings.

Files written to OUT (each is skipped when OUT/meta.json says it was already
written with the same arguments, unless --force):

  links.tsv        code<TAB>url                      (`uload import` TSV)
  links.csv        code,url,status (status 301)      (`uload import` CSV: the
                   comparison imports this one, so that uload answers with the
                   same status as nginx's `return 301` and HAProxy's `code 301`)
  nginx_map.conf   `/code "url";` lines, to `include` inside
                   `map $uri $target { ... }`
  haproxy.map      `/code url` lines, for `path,map(FILE)` (map_str)
  codes.txt        every code, one per line, fixed width; line order is the
                   popularity order the load mix uses (line 0 = most popular)
  unknown.txt      codes that are NOT in the set (same length), for the 5%
                   unknown-code share of the mix
  meta.json        the arguments and counts

Usage: gen_links.py -n 1000000 --out /var/tmp/uload-loadtest/links-1000000
"""

import argparse
import json
import os
import random
import sys
import time

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
# Codes the edge routes itself (uload::admin::RESERVED_CODES, compared
# ignoring case); never generate them.
RESERVED = {"api", "health", "metrics", "favicon.ico", "robots.txt",
            ".well-known", "admin", "static", "assets"}
FORMAT_VERSION = 1


def url_for(i):
    # Same shape as docs/benchmarks.md's import benchmark (about 70 bytes).
    return f"https://example.com/articles/{i}?utm_source=uload&utm_medium=short"


def make_codes(n, code_len, rng):
    """n distinct codes in generation order."""
    space = len(ALPHABET) ** code_len
    if n > space // 4:
        sys.exit(f"gen_links: {n} codes do not fit comfortably in {code_len} base36 characters")
    seen = set()
    codes = []
    randbelow = rng.randrange
    while len(codes) < n:
        v = randbelow(space)
        if v in seen:
            continue
        seen.add(v)
        s = _b36(v, code_len)
        if s in RESERVED:
            continue
        codes.append(s)
    return codes, seen


def _b36(v, width):
    out = []
    for _ in range(width):
        v, r = divmod(v, 36)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, required=True, help="number of links")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--code-len", type=int, default=7, help="code length (>= 7)")
    ap.add_argument("--unknown", type=int, default=100_000, help="unknown codes to write")
    ap.add_argument("--force", action="store_true", help="rewrite even if meta.json matches")
    args = ap.parse_args()
    if args.code_len < 7:
        sys.exit("gen_links: --code-len must be at least 7")
    os.makedirs(args.out, exist_ok=True)
    meta_path = os.path.join(args.out, "meta.json")
    want = {"format": FORMAT_VERSION, "n": args.n, "seed": args.seed,
            "code_len": args.code_len, "unknown": args.unknown}
    if not args.force and os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                have = json.load(f)
            if all(have.get(k) == v for k, v in want.items()):
                print(f"gen_links: {args.out} already holds {args.n} links (seed {args.seed}); reusing",
                      file=sys.stderr)
                return
        except (OSError, ValueError):
            pass
        os.remove(meta_path)

    t0 = time.monotonic()
    rng = random.Random(args.seed)
    codes, seen = make_codes(args.n, args.code_len, rng)
    space = len(ALPHABET) ** args.code_len
    unknown = []
    while len(unknown) < args.unknown:
        v = rng.randrange(space)
        if v in seen:
            continue
        seen.add(v)
        s = _b36(v, args.code_len)
        if s in RESERVED:
            continue
        unknown.append(s)
    del seen
    t1 = time.monotonic()

    def write(name, lines_fn):
        path = os.path.join(args.out, name)
        tmp = path + ".tmp"
        with open(tmp, "w", buffering=1 << 20) as f:
            lines_fn(f)
        os.replace(tmp, path)

    def tsv(f):
        w = f.write
        for i, c in enumerate(codes):
            w(f"{c}\t{url_for(i)}\n")

    def csv(f):
        w = f.write
        w("code,url,status\n")
        for i, c in enumerate(codes):
            w(f"{c},{url_for(i)},301\n")

    def nginx(f):
        w = f.write
        w(f"# {args.n} links, generated by loadtest/gen_links.py (seed {args.seed}); "
          "include inside map $uri $target { ... }\n")
        for i, c in enumerate(codes):
            w(f'/{c} "{url_for(i)}";\n')

    def haproxy(f):
        w = f.write
        w(f"# {args.n} links, generated by loadtest/gen_links.py (seed {args.seed})\n")
        for i, c in enumerate(codes):
            w(f"/{c} {url_for(i)}\n")

    def code_list(items):
        def fn(f):
            f.write("\n".join(items))
            f.write("\n")
        return fn

    write("links.tsv", tsv)
    write("links.csv", csv)
    write("nginx_map.conf", nginx)
    write("haproxy.map", haproxy)
    write("codes.txt", code_list(codes))
    write("unknown.txt", code_list(unknown))
    t2 = time.monotonic()
    meta = dict(want, codes=len(codes), unknown_written=len(unknown),
                first_code=codes[0], generate_s=round(t1 - t0, 2), write_s=round(t2 - t1, 2))
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"gen_links: {args.n} links in {args.out} (codes {t1 - t0:.1f} s, files {t2 - t1:.1f} s)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
