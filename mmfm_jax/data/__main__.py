"""Data tools: `python -m mmfm_jax.data pack --src DIR --out PREFIX [--num-shards N]`."""

import argparse
import logging

from mmfm_jax.data.packed import pack_imagefolder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmfm_jax.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="pack an ImageFolder tree into ArrayRecord shards")
    pack.add_argument("--src", required=True, help="ImageFolder root (class subdirectories)")
    pack.add_argument("--out", required=True, help="output prefix: PREFIX-0000i-of-0000n")
    pack.add_argument("--num-shards", type=int, default=64)
    pack.add_argument("--num-threads", type=int, default=16, help="file-reading threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pack_imagefolder(args.src, args.out, args.num_shards, num_threads=args.num_threads)


if __name__ == "__main__":
    main()
