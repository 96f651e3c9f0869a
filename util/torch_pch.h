// Precompiled header shared by every target that uses libtorch (see
// CMakeLists.txt: loom_pch). Only heavy, stable third-party headers belong here.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn.h>
#include <torch/types.h>
#include <torch/utils.h>
