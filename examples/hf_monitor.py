"""The linearity metrics inside a Hugging Face Trainer run (pip install transformers accelerate); seconds on a CPU.

    python examples/hf_monitor.py                   # LAZYHASTY_EXAMPLE_STEPS=6 for a quicker run

A tiny randomly initialised BERT classifier (built from a config: nothing is downloaded; dropout at its
default) trained by ``transformers.Trainer``. The probe set is a tokenized batch (a dict of tensors passed as
keyword arguments; ``labels`` is dropped), the output a ``ModelOutput`` measured through its logits, and the
values go through ``Trainer.log``: ``state.log_history`` and every ``report_to`` integration get them.
"""
import copy
import os
import tempfile

import torch
import transformers

from lazyhasty import Monitor
from lazyhasty.integrations import LazyhastyTrainerCallback

STEPS = int(os.environ.get("LAZYHASTY_EXAMPLE_STEPS", "40"))
torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32, num_labels=2)
model = transformers.BertForSequenceClassification(config)
n, length = 256, 12
input_ids = torch.randint(0, 100, (n, length))
attention_mask = torch.ones(n, length, dtype=torch.long)
labels = (input_ids[:, 0] < 50).long()  # a rule the model can learn: the first token's half of the vocabulary

PROBE = 32 if STEPS >= 20 else 8  # probe examples (a quick run takes fewer)
probe = {"input_ids": input_ids[:PROBE], "attention_mask": attention_mask[:PROBE]}
monitor = Monitor(copy.deepcopy(model), probe,  # no ReLU in BERT: repr_alignment and ntk_alignment
                  groups={"train": {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}})
cb = LazyhastyTrainerCallback(monitor, every_n_steps=max(STEPS // 4, 1))
args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=STEPS, per_device_train_batch_size=32,
                                      learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                      disable_tqdm=True, logging_steps=max(STEPS // 4, 1))
trainer = transformers.Trainer(model=model, args=args, callbacks=[cb], train_dataset=[
    {"input_ids": a, "attention_mask": m, "labels": b} for a, m, b in zip(input_ids, attention_mask, labels)])
trainer.train()
for step, values in cb.logged:
    print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
history = [h for h in trainer.state.log_history if "ntk_alignment" in h]
