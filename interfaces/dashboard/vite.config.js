// Builds the dashboard into the API service's package, which serves it at /dashboard (no Node at run time).
import { defineConfig } from "vite";

export default defineConfig({
  base: "/dashboard/",
  build: {
    outDir: "../../services/api/tidepool_api/dashboard",
    emptyOutDir: true,
    chunkSizeWarningLimit: 1024,
  },
});
