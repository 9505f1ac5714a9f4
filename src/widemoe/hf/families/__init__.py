"""One Hugging Face family adapter per module; `widemoe.hf.registry` finds them (every module's
``ADAPTERS``), so adding a family adds a module here and touches no generic code."""
