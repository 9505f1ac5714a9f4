"""Helpers shared by the parity tests: widemoe config fields in transformers' v5 form."""


def hf_rope_parameters(cfg) -> dict:
    """Our rope fields as transformers v5 ``rope_parameters``."""
    rp = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rp.update({k: v for k, v in cfg.rope_scaling.items() if k != "type"})
        rp["rope_type"] = cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type"))
    return rp
