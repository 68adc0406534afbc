"""Training of the Semantic Motion Predictor and the video U-Net (`python -m train`)."""
