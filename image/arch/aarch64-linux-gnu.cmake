# CMake toolchain file: llama-cpp-python's C/C++ built on this x86-64 host for aarch64 with Debian's cross compilers
# (crossbuild-essential-arm64), libraries and headers from /usr/aarch64-linux-gnu. image/image.mk uses it.
set(CMAKE_SYSTEM_NAME Linux)
# aarch64 makes ggml's GGML_SYSTEM_ARCH "ARM": the ARM CPU variants, not x86's.
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
