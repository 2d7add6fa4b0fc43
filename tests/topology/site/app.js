"use strict";

// What the test waits for: body[data-state] leaves "pending" once the
// function call and the WebSocket echo have both come back through the tunnel.

async function callFunction() {
  const response = await fetch("/function/hello", { method: "POST", body: "browser" });
  if (!response.ok) {
    throw new Error(`fetch answered HTTP ${response.status}`);
  }
  return response.text();
}

function echoOverWebSocket() {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(`ws://${location.host}/ws`);
    socket.onopen = () => socket.send("ping from the browser");
    socket.onmessage = (event) => {
      resolve(event.data);
      socket.close(1000);
    };
    socket.onerror = () => reject(new Error("WebSocket failed"));
  });
}

async function main() {
  try {
    const [called, echoed] = await Promise.all([callFunction(), echoOverWebSocket()]);
    document.getElementById("fetch-result").textContent = called;
    document.getElementById("ws-result").textContent = echoed;
    document.body.dataset.state = "ready";
  } catch (error) {
    document.body.dataset.state = `failed: ${error.message}`;
  }
}

main();
