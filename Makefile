# The two commands a newcomer needs: `make demo` and `make test`. Both bootstrap the environment.
.PHONY: demo test test-gpu bench-gpu bench bench-fidelity bench-stream bench-vla bench-vla-pi0 bench-vla-fidelity bench-encoder bench-vla-encoder bench-models bench-methods bench-batch setup lint

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

setup:
	@bash scripts/bootstrap.sh

demo: setup
	.venv/bin/streamprune summarize sample:bigbuckbunny --model tiny --retain 0.1 --save-viz out/demo_holitom.png

# the core suite runs on the CPU (fp32) even where a GPU is visible; tests/gpu is `make test-gpu`.
# robosuite reads CUDA_VISIBLE_DEVICES to pick its EGL device, so that one is named explicitly.
test: setup
	CUDA_VISIBLE_DEVICES= MUJOCO_EGL_DEVICE_ID=0 .venv/bin/python -m pytest -q

# on a machine with a CUDA GPU: the device checks on CUDA, every model family, compiled decode
test-gpu: setup
	.venv/bin/python -m pytest -q tests/gpu

# on a machine with a CUDA GPU: TTFT / reduce / decode at 7B dimensions, results in benchmarks/results/gpu/
bench-gpu: setup
	.venv/bin/python -m benchmarks.bench_gpu

lint: setup
	.venv/bin/ruff check streamprune policies envs tests benchmarks

bench: setup
	.venv/bin/python benchmarks/bench_summarize.py

bench-stream: setup
	.venv/bin/python benchmarks/bench_stream.py

bench-vla: setup
	.venv/bin/python -m benchmarks.bench_vla

bench-vla-pi0: setup
	.venv/bin/python -m benchmarks.bench_vla_pi0

bench-vla-fidelity: setup
	.venv/bin/python -m benchmarks.bench_vla_fidelity --policy smolvla
	.venv/bin/python -m benchmarks.bench_vla_fidelity --policy pi0 --episodes 1 --chunks 9

bench-encoder: setup
	.venv/bin/python -m benchmarks.bench_encoder

bench-vla-encoder: setup
	MUJOCO_GL=egl .venv/bin/python -m benchmarks.bench_vla_encoder --env pusht

bench-batch: setup
	.venv/bin/python -m benchmarks.bench_batch
	.venv/bin/python -m benchmarks.bench_batch --copies 32

bench-methods: setup
	.venv/bin/python -m benchmarks.bench_methods

bench-models: setup
	.venv/bin/python -m benchmarks.bench_models --model qwen2.5-vl-3b --max-pixels 200704
	.venv/bin/python -m benchmarks.bench_models --model smolvlm2-500m --repeats 3
	.venv/bin/python -m benchmarks.bench_models --model smolvlm2-500m --videos bigbuckbunny carphone_distorted --encoder reuse tome:0.9 reuse+tome:0.9 --out benchmarks/results/models_smolvlm2-500m_encoder.json
	.venv/bin/python -m benchmarks.bench_models --model tiny-qwen2.5-vl --steps 16 --videos bigbuckbunny bikes carphone_distorted carphone_pristine
	.venv/bin/python -m benchmarks.bench_models --model tiny-qwen3-vl --steps 16 --videos bigbuckbunny bikes carphone_distorted carphone_pristine

bench-fidelity: setup
	.venv/bin/python benchmarks/bench_fidelity.py
