# Benchmarks: each writes its own section of BENCHMARKS.md (command, machine, date, figures).
.PHONY: bench bench-decode

bench: bench-decode

bench-decode: venv speed-model
	$(PY) bench/decode.py --model $(SPEED_MODEL) --threads 2

.PHONY: bench-scheduling
bench: bench-scheduling

bench-scheduling: venv speed-model
	$(PY) bench/scheduling.py --model $(SPEED_MODEL)
