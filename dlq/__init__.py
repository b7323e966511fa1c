"""Dead letters: reason codes and the one envelope every stage uses."""
