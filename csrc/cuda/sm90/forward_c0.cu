// Forward grouped GEMM, configuration 0: 64 x 128 x 128 CTA tile, cluster 2 x 1, ping-pong warp groups.
#include "grouped_gemm_sm90.cuh"

using ForwardTile0 = moe::cuda::sm90::TileConfig<64, 128, 128, 2, true>;
MOE_SM90_FORWARD(0, ::ForwardTile0)
