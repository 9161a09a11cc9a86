// Keeping a tenant beyond MPS's places off MPS (stmux/mps_seats.h): the
// shim answers the CUDA driver's one question of where MPS's pipes are.
#pragma once

namespace stmux::shim {

// Whether this process found every place on MPS taken and was kept off it.
bool keptOffMps();

}  // namespace stmux::shim
