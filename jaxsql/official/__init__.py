"""Metrics that carry a benchmark's name, computed exactly as its released evaluator does.

One module per source (each names its repository, file and commit):

| module | metrics |
|---|---|
| `jaxsql.official.bird` | ``bird_ex`` |
| `jaxsql.official.spider` | ``spider_ex`` (test-suite ``eval_exec_match``) |
| `jaxsql.official.qatch` | ``cell_precision``, ``cell_recall``, ``tuple_cardinality``, ``tuple_constraint``, ``tuple_order`` |
| `jaxsql.official.think2sql` | ``think2sql_ex``, ``cp_cr_tc`` |
| `jaxsql.official.wikitq` | ``wikitq_accuracy`` (``check_denotation``) |

Our own variants (float tolerance, order-free rows, relaxed denotations) live
in `jaxsql.compare` under their own names. All functions are pure and run in
linear or ``n log n`` time on results and text, except the Spider column
permutation search, which is capped (`jaxsql.official.spider.SearchCapped`).
"""
