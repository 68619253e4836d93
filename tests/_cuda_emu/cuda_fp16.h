// Stand-in for the CUDA header of that name under the emulation: emu.h (force-included) has its types.
#pragma once
#include "emu.h"
