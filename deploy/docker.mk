# Docker targets for Gorgon. Included from the top-level Makefile (`include deploy/docker.mk`).
#
#   make docker-check   lint, validate, build the CPU image, run the compose stack, send a
#                       completion, check Prometheus and the dashboard queries, tear down
#   make docker-lint    only hadolint + compose/Prometheus/Grafana config validation (no engine)
#   make docker-build   lint, validate and build the CPU image (gorgon:cpu), run nothing
#
# Environment knobs (see scripts/docker-check.sh): GORGON_IMAGE, TORCH_WHEEL_DIR,
# PIP_CA_BUNDLE, DOCKER_CHECK_TIMEOUT, DOCKER_CHECK_TOOLS_VENV.

DOCKER_CHECK_SCRIPT ?= scripts/docker-check.sh

.PHONY: docker-check docker-lint docker-build

docker-check:
	bash $(DOCKER_CHECK_SCRIPT)

docker-lint:
	bash $(DOCKER_CHECK_SCRIPT) --lint-only

docker-build:
	bash $(DOCKER_CHECK_SCRIPT) --build-only
