"""Run artifacts and TensorBoard: where measurements are written, never what is measured."""
