"""Evaluation: sample statistics (pass@k, diversity) shared by the trainer's periodic evaluation and the demo."""
