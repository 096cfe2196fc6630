"""Job state and plumbing shared by the API (``service``) and the workers (``worker``): settings, the
Redis job store, metrics, the task queue's configuration and the embedded Redis. It imports neither."""
