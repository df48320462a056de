"""`make bench`: the fast benchmarks side by side, plus the defense harness in quick mode.

The full tables are separate, documented commands (tens of minutes to hours on 2 cores):
``python -m benchmarks.attack_table`` and ``python -m benchmarks.defense_table``.
"""

from benchmarks import defense_table, families_bench, method_bench, scale_bench, shard_bench


def main() -> None:
    method_bench.main()
    families_bench.main([])
    shard_bench.main([])
    # ImageNet-shaped at a small size: 1,000 and 4,000 synthetic JPEGs, ResNet-50 at batch 2 on one
    # thread (two threads on two busy cores made its steps many times slower: docs/scale.md)
    scale_bench.main(["--images", "1000", "--model-batch", "2", "--steps", "1", "--threads", "1"])
    defense_table.main(["--quick"])


if __name__ == "__main__":
    main()
