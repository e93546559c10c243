"""Every patch over Flower's private code, every copy of Flower code, every import of Flower's private modules.

A Flower upgrade is reviewed here, and ``tests/runtime/test_flower_tripwires.py``
fails when it moves or changes anything below:

- ``polling``: Flower's fixed 3 s sleeps (SuperNode, ServerApp grid), capped.
- ``supernode``: the SuperNode runs only fedsilo's installed ClientApp (FAB pin),
  starts fedsilo's SuperExec (warm ClientApps), polls with the capped sleeps.
- ``superexec``: Flower's SuperExec, forking ClientApps from a warm forkserver.
- ``workflow``: ``ResumableWorkflow``, a copy of ``DefaultWorkflow.__call__`` that
  starts at a later round.
- ``internals``: the one place the rest of fedsilo imports Flower's private modules from.
"""
