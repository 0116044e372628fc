# Load testing with locust (included from the Makefile: `include loadtest/loadtest.mk`).
#
#   make loadtest                                   # 16 users for 60 s against http://127.0.0.1:8000
#   make loadtest HOST=http://10.0.0.5:8000 USERS=64 SPAWN_RATE=8 DURATION=5m OUT=/tmp/lt
#
# Writes $(OUT)/locust_stats.csv, _stats_history.csv, _failures.csv, _exceptions.csv and
# $(OUT)/report.html. The server must already be running (e.g. `make serve`). Locust is
# installed into the project venv on first use (the optional extra `loadtest`), never into
# the core dependencies. Request settings: GORGON_LT_* variables, see loadtest/locustfile.py.
#
# HOST may be a full URL or, as in the main Makefile (HOST ?= 127.0.0.1), a bare address,
# which is then combined with PORT.
HOST ?= http://127.0.0.1:8000
USERS ?= 16
SPAWN_RATE ?= 4
DURATION ?= 60s
OUT ?= loadtest/results
# in-flight requests may finish after DURATION instead of being cut off (and counted)
STOP_TIMEOUT ?= 300
LOADTEST_ARGS ?=
LOADTEST_PY ?= $(if $(PY),$(PY),.venv/bin/python)
LOADTEST_URL = $(if $(findstring ://,$(HOST)),$(HOST),http://$(HOST):$(or $(PORT),8000))

.PHONY: loadtest loadtest-install

loadtest-install:
	@test -x $(LOADTEST_PY) || { echo "no $(LOADTEST_PY): run 'make install' first"; exit 1; }
	@$(LOADTEST_PY) -c "import locust" 2>/dev/null || $(LOADTEST_PY) -m pip install -q locust

loadtest: loadtest-install
	mkdir -p $(OUT)
	$(LOADTEST_PY) -m locust -f loadtest/locustfile.py --host $(LOADTEST_URL) --headless \
		--users $(USERS) --spawn-rate $(SPAWN_RATE) --run-time $(DURATION) --stop-timeout $(STOP_TIMEOUT) \
		--csv $(OUT)/locust --csv-full-history --html $(OUT)/report.html --only-summary $(LOADTEST_ARGS)
