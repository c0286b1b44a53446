"""The worker engine: the process that serves the queues, the resident runtime, job functions
(payload in, API result out) and what a running job sees (progress, cancel, failures)."""
