"""The three variants of the Flower peer benchmark (``benchmarks/flower.py``), one module each.

``task``: the shared FedAvg workload of the peer anchor (shared/research/peer-anchors.md §2a);
``bare``: a plain PyTorch FedAvg loop; ``flower_sim``: the same workload under Flower's
``run_simulation`` (Message API); ``simkit_run``: the equivalent simkit scenario.
Each variant module is run as its own process: ``python -m benchmarks.flower_app.<variant>``.
"""
