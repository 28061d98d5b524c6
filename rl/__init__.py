"""Learning: GRPO/DAPO/Dr.GRPO losses and advantages, rollout, trainer, SFT, checkpoints."""
