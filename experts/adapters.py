"""LoRA adapters on a shared base model (peft): several experts in one deployment.

Every adapter is loaded under its expert name; a batch can mix adapters (peft's
`adapter_names`), so requests for different adapters still share engine calls.
"""

from __future__ import annotations

import json
from pathlib import Path


def check_adapter(base_path: Path, name: str, adapter_path: Path) -> dict:
    """Fail early, naming the adapter, when its folder is missing or was made for another base."""
    adapter_path = Path(adapter_path)
    cfg_file = adapter_path / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"adapter {name!r}: no peft adapter at {str(adapter_path)!r} (adapter_config.json "
            "missing)")
    cfg = json.loads(cfg_file.read_text())
    made_for = cfg.get("base_model_name_or_path")
    if made_for and Path(made_for).name != Path(base_path).name:
        raise ValueError(
            f"adapter {name!r} was trained on base {Path(made_for).name!r}, not on "
            f"{Path(base_path).name!r}")
    return cfg


def attach_adapters(model, base_path: Path, adapters: dict[str, str | Path]):
    """Wrap `model` in a PeftModel holding every adapter; returns the PeftModel."""
    try:  # peft is the optional quant extra: only a base with adapters needs it
        from peft import PeftModel
    except ImportError:
        raise ValueError("LoRA adapters need peft: `pip install 'frugalserve[quant]'`") from None
    peft_model = None
    for name, path in adapters.items():
        check_adapter(base_path, name, Path(path))
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            else:
                peft_model.load_adapter(str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"adapter {name!r} at {path} does not fit base "
                             f"{Path(base_path).name!r}: {str(exc).splitlines()[0]}") from None
    if peft_model is None:
        raise ValueError("attach_adapters needs at least one adapter")
    peft_model.eval()
    return peft_model
