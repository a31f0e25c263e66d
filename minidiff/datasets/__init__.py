"""The pieces behind `minidiff.data`: built-in data sets, user files, batching and PNG grids.

Import from `minidiff.data`; these submodules are its implementation, split by concept:
  base      Dataset, DataError, validation and scaling shared by every source
  builtin   the bundled digits, procedural shapes and 2-D point sets
  files     the user's .npy / .npz / .h5 arrays and MNIST-style IDX files (gzipped or not)
  batches   BatchIterator: seeded epoch shuffling with a resumable state
  png       save_image_grid: a PNG writer on zlib + struct, no matplotlib
"""
