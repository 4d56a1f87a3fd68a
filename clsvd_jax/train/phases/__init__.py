"""The phases of a continual-learning run, in the order ``runner.run`` calls them:

1. ``prepare``: read the model, the tokenizer and every task's data (bad input fails here, before any training);
2. ``start``: a fresh ``RunState`` and ``TrainState``, or those of the newest usable checkpoint (``--resume``);
3. for each stage (``RunState.stage``), in the order of ``RunState.phase``:
   ``boundary`` (protect subspaces, reset moments), ``train_task`` (the optimizer steps),
   ``evaluate`` (the invariant over the task and one row of R), then a checkpoint;
4. ``write``: ``results.json``, ``R.csv``, the plots and the tables.

Each phase is a function of the run's fixed ``context.RunContext``, its ``run_state.RunState`` (which it updates:
the checkpoint meta) and its arrays ``run_state.TrainState`` (which it returns, new).
"""
