"""Fine-tuning jobs: `plan` (request → per-step options), `estimate` (tokens, time, cost),
`states` (the names of a job's life and its allowed transitions), `lifecycle` (the only code that
moves a job: API, worker and sweeper alike), `queries` (reading jobs and what they wrote).

Nothing is imported here, so `states` can be imported from anywhere without cycles."""
