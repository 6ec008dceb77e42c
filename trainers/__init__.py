"""Fine-tuning of compressed networks (BaseTrainer hooks, tensorboardX logging, distillation): not written yet."""
