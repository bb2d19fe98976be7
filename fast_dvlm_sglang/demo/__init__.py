"""The bundled demo: a tiny Qwen2.5-VL-architecture model trained on synthetic shapes with the
Fast-dVLM recipe (`train.py`), its dataset (`shapes.py`) and evaluation (`evaluate.py`)."""

from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).parent / "checkpoint"
