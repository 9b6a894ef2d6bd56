"""pack: normalize's messages -> tokens with loss masks, through the chat template, packed into
fixed-length rows (SFT) or kept as token pairs (DPO, KTO, GRPO): results/pack/<split>/.
"""
