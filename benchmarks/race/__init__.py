"""The framework race's parts (``benchmarks/frameworks.py`` is the harness): the shared
networks and configurations (:mod:`race.common`), the rows and how springfield's kernel
variants are switched (:mod:`race.rows`), one runner per framework (:mod:`race.run_springfield`,
:mod:`race.run_torch`, :mod:`race.run_keras`), the worker process's loop
(:mod:`race.worker`) and the tables (:mod:`race.tables`)."""
