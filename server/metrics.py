"""Prometheus metrics, all prefixed `gorgon_`. The engine and the HTTP layer update them."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no *_created series: they only clutter /metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

requests = Counter("gorgon_requests", "Finished requests", ["finish_reason", "status"])
http_requests = Counter("gorgon_http_requests", "HTTP responses by route and status code",
                        ["route", "status_code"])
prompt_tokens = Counter("gorgon_prompt_tokens", "Prompt tokens computed (not those found in the prefix cache)")
generation_tokens = Counter("gorgon_generation_tokens", "Tokens generated")
time_to_first_token = Histogram("gorgon_time_to_first_token_seconds", "Arrival to first token",
                                buckets=LATENCY_BUCKETS)
inter_token_latency = Histogram("gorgon_inter_token_latency_seconds",
                                "Time between a request's successive tokens (a step's tokens share its time)",
                                buckets=LATENCY_BUCKETS)
e2e_request_latency = Histogram("gorgon_e2e_request_latency_seconds", "Arrival to finish",
                                buckets=REQUEST_BUCKETS)
request_queue_time = Histogram("gorgon_request_queue_time_seconds", "Arrival to first scheduled",
                               buckets=REQUEST_BUCKETS)
num_requests_running = Gauge("gorgon_num_requests_running", "Requests in the running batch")
num_requests_waiting = Gauge("gorgon_num_requests_waiting", "Requests waiting to be scheduled")
kv_cache_usage = Gauge("gorgon_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use")
prefix_cache_queries = Counter("gorgon_prefix_cache_queries",
                               "Prompt tokens of requests looked up in the prefix cache (at their first admission)")
prefix_cache_hits = Counter("gorgon_prefix_cache_hits",
                            "Of them, tokens found cached (their keys and values not computed again)")
num_preemptions = Counter("gorgon_num_preemptions", "Requests preempted (recomputed later)")
spec_steps = Counter("gorgon_spec_decode_steps", "Decoding steps of sequences (one per sequence per step)")
spec_draft_tokens = Counter("gorgon_spec_decode_draft_tokens", "Drafted tree tokens verified")
spec_accepted_tokens = Counter("gorgon_spec_decode_accepted_tokens",
                               "Drafted tokens accepted (mean accepted length = 1 + accepted / steps)")
spec_accepted_per_position = Counter("gorgon_spec_decode_accepted_tokens_per_position",
                                     "Accepted drafted tokens by depth in the tree (head position)",
                                     ["position"])
spec_tree_budget = Gauge("gorgon_spec_decode_tree_budget", "Mean tree size (nodes) chosen in the last step")
step_duration = Histogram("gorgon_engine_step_duration_seconds", "Duration of one engine step",
                          buckets=LATENCY_BUCKETS)
