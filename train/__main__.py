"""`python -m train`: not yet part of this release (the transition-video model comes first)."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Training of the Semantic Motion Predictor + video U-Net on WebVid. Not available yet in this "
                    "release: it builds on the transition-video model, which comes first. Today you can convert "
                    "checkpoints (python -m convert) and generate comics (python -m infer.story).")
    parser.parse_args(argv)
    print("error: training is not available in this release yet; see README.md for what is", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
