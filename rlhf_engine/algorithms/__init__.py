"""Pure tensor functions: losses, masking (and, with step 3, KL, GAE, PPO). No state, no configs."""
