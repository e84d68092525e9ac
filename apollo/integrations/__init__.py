"""Adapters that put this project's optimizers into other trainers.

`titan_groups` (torch only) expresses `apollo.build_optimizer`'s routing as torchtitan's FQN-pattern
param groups and builds any registered optimizer from such groups; `torchtitan` (imports torchtitan,
so only in an environment that has it) is the optimizers container and the job configs
(`python -m torchtitan.train --module apollo.integrations.torchtitan --config ...`).
Nothing here is imported by `import apollo`.
"""
