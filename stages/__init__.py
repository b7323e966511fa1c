"""Pure stage logic: input records (+ state, + clock) → outputs and dead letters.

Nothing here imports Faust, confluent-kafka or prometheus-client; the runner
(:mod:`pipeline.runner`) binds these functions to Kafka.
"""
