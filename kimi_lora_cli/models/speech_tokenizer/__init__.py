"""GLM-4-Voice speech tokenizer (Whisper-VQ encoder): 16 kHz audio -> 12.5 Hz semantic codes."""
