// Weight-gradient grouped GEMM (per expert (X, Y, rows_e); A = a_NX's rows transposed, B = g_NY's
// rows), configuration 2: 64 x 256 x 64 CTA tile, cluster 1 x 1, ping-pong warp groups.
#include "grouped_gemm_sm90.cuh"

using WgradTile2 = moe::cuda::sm90::TileConfig<64, 256, 64, 1, true>;
MOE_SM90_WGRAD(2, ::WgradTile2)
