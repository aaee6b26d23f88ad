"""The QLoRA objective: resident 4-bit base, data, training loop, evaluation."""
