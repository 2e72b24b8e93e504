"""`clipa-ds index URLS... [--out sizes.json]`: count the samples of every shard.

The result is webdataset's `sizes.json` ({shard file name: samples}; full URLs if two shards
share a file name). Give it to training as `data.index=PATH` so that any shortfall (a corrupt
header or truncated tar that appears later, a shard that fails) is counted per sample.
Shards are streamed with the same strict tar reader as training (no image decoding);
damaged shards are listed and their complete samples counted. The last line printed is a JSON
summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from clipa_ds.config import DataConfig, S3Config
from clipa_ds.data import storage
from clipa_ds.data.shards import RetryingStream, RetryPolicy, ShardFailed, expand_urls
from clipa_ds.data.tario import TarError, iter_samples


def count_samples(url: str, settings: storage.StorageSettings, policy: RetryPolicy) -> tuple[int, str]:
    """(complete samples, "" or what is wrong with the shard)."""
    stream = RetryingStream(url, 0, lambda u, o: storage.open_at(u, o, settings), policy)
    count = 0
    try:
        for _ in iter_samples(stream):  # type: ignore[arg-type]
            count += 1
    except TarError as err:
        return err.samples, f"{type(err).__name__}: {err}"
    except ShardFailed as err:
        return count, str(err)
    finally:
        stream.close()
    return count, ""


def build_index(urls: Sequence[str], data_cfg: DataConfig, threads: int = 8) -> tuple[dict[str, int], dict[str, str]]:
    settings = storage.StorageSettings.from_config(data_cfg)
    policy = RetryPolicy(data_cfg.max_attempts, data_cfg.retry_backoff_s, data_cfg.retry_backoff_max_s)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda u: count_samples(u, settings, policy), urls))
    names = [u.rsplit("/", 1)[-1] for u in urls]
    keys = names if len(set(names)) == len(names) else list(urls)
    sizes = {k: n for k, (n, _) in zip(keys, results)}
    problems = {u: why for u, (_, why) in zip(urls, results) if why}
    return sizes, problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipa-ds index", description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", help="shard URLs or brace patterns (local, s3://, gs://, https://)")
    parser.add_argument("--out", default="sizes.json", help="where to write the index (any fsspec URL)")
    parser.add_argument("--threads", type=int, default=8, help="shards read in parallel")
    parser.add_argument("--s3-endpoint-url", default="", help="S3 endpoint (else $AWS_ENDPOINT_URL)")
    parser.add_argument("--s3-region", default="", help="S3 region (else $AWS_REGION)")
    parser.add_argument("--s3-profile", default="", help="AWS profile (else $AWS_PROFILE); keys come from the environment")
    args = parser.parse_args(argv)

    urls = [u for pattern in args.urls for u in expand_urls(pattern)]
    if not urls:
        parser.error("the URL patterns expand to no shards")
    cfg = DataConfig(s3=S3Config(endpoint_url=args.s3_endpoint_url, region=args.s3_region, profile=args.s3_profile))
    sizes, problems = build_index(urls, cfg, args.threads)
    for url, why in problems.items():
        print(f"damaged shard {url}: {why}", file=sys.stderr)
    text = json.dumps(sizes, indent=1, sort_keys=True)
    settings = storage.StorageSettings.from_config(cfg)
    if storage.is_remote(args.out):
        with storage.filesystem(args.out, settings).open(args.out, "w") as handle:
            handle.write(text)
    else:
        with open(args.out, "w") as handle:
            handle.write(text)
    summary = {"shards": len(urls), "samples": sum(sizes.values()), "damaged": sorted(problems), "out": args.out}
    print(json.dumps(summary))
    return 1 if len(problems) == len(urls) else 0


if __name__ == "__main__":
    sys.exit(main())
